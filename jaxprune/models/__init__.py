"""LLaVA building blocks: CLIP vision tower, Llama decoder, projector and their assembly."""
