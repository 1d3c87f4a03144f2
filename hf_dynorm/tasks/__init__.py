"""lm-evaluation-harness tasks hf_dynorm ships (downstream.SHIPPED): task YAMLs and the code that builds their data."""
