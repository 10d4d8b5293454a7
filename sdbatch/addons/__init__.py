"""Add-ons users download beside a model: LoRA / LyCORIS networks and textual-inversion embeddings.

lora.py        reads a LoRA file (kohya, LoCon, LoHa, LoKr, PEFT/diffusers names, DoRA) into patches
               on our module names, checked against the model's shapes (torch-free until merged)
merge.py       merges a set of LoRAs into a model's weights and restores the originals bitwise
embeddings.py  reads textual-inversion embeddings (A1111 .pt, kohya/single-tensor .safetensors,
               diffusers learned_embeds) and finds them in token sequences, as A1111 does
library.py     finds add-ons by name in their folders, hashes them (sha256 and A1111's short hashes)
"""
