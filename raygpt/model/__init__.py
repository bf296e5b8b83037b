"""The GPT, its loading from checkpoints and Hugging Face, and text generation."""
