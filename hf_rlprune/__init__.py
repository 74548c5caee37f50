"""hf_rlprune: structured pruning with a PPO agent, as a Hugging Face Trainer callback."""
