"""The recipes as package data: YAML configs for `hf-dynorm distill --config` (README, "Recipes")."""
