"""Writes the example add-ons `jobs/lora.yaml` uses, for the demo model (run from the checkout:
`python jobs/make_addons.py`; the files are committed, a few KB each, so this is only needed to
see how they were made).

- `embeddings/roundthing.safetensors`: a one-vector textual-inversion embedding (kohya's
  `emb_params` layout) holding the demo text encoder's own token vector for "circle", so that
  "a red roundthing" renders what "a red circle" renders: the smallest embedding whose effect
  can be checked by eye.
- `loras/demo-warp.safetensors`: a kohya-format LoRA (rank 4, alpha 2) with seeded random weights on
  every attention projection of the demo UNet and text encoder. It was not trained: it shows the
  syntax, the weight sweep and the contact sheet; weight 0 is the plain model, and the picture
  drifts further from it as the weight grows.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from sdbatch.addons.library import model_shapes
from sdbatch.addons.lora import model_names
from sdbatch.checkpoints import load_model, model_config
from sdbatch.tokenizer import load_tokenizer

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "weights" / "demo" / "model.safetensors"


def embedding() -> None:
    model = load_model(DEMO).model
    [token] = load_tokenizer(DEMO, model.config.clip.vocab_size).tokens("circle")
    vector = model.text_encoder.transformer.text_model.embeddings.token_embedding.weight[token]
    save_file({"emb_params": vector[None].clone().contiguous()}, HERE / "embeddings" / "roundthing.safetensors")


def lora(rank: int = 4, alpha: float = 2.0, seed: int = 0) -> None:
    config = model_config(DEMO)
    shapes = model_shapes(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, key in sorted(model_names(shapes, config.unet).items()):
        projection = any(p in key for p in (".to_q.", ".to_k.", ".to_v.", ".to_out.0.", "_proj."))
        ldm_spelling = any(b in name for b in ("input_blocks", "middle_block", "output_blocks"))
        if not name.startswith(("lora_unet_", "lora_te_")) or not projection or ldm_spelling:
            continue  # one kohya name per layer (the diffusers-path spelling), projections only
        if "lora_te_text_model_" not in name and name.startswith("lora_te_"):
            continue
        out_features, in_features = shapes[key][:2]
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.5
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, HERE / "loras" / "demo-warp.safetensors", metadata={"ss_network_dim": str(rank)})


if __name__ == "__main__":
    embedding()
    lora()
