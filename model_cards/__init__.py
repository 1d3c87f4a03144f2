"""Model-card templates (Jinja), shipped inside the package as hf_dynorm.model_cards."""
