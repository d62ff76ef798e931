"""Full supervised fine-tuning pipeline: one module per dvc.yaml stage."""
