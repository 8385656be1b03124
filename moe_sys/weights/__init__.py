"""Model weights on disk: moe_sys checkpoints, safetensors files and Hugging Face directories."""
