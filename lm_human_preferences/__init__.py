"""lm_human_preferences: a PyTorch reimplementation of "Fine-Tuning Language Models from Human Preferences"."""
