"""Tiny random diffusers pipelines built from configs and saved in the layouts the product loads (tests only).

No diffusion, IP-Adapter or CLIP weights exist offline: the pipeline (UNet, VAE, CLIP text encoder with a tokenizer
built from open_clip's BPE vocabulary), a tiny AutoencoderTiny and tiny IP-Adapters (one matching the tiny UNet, in
the h94/IP-Adapter file layout) are written to folders. conftest.py's session fixture ``tiny_sd`` builds them once.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

SIZE = 64


def build_clip_tokenizer(folder: Path):
    """A CLIPTokenizer with CLIP's real vocabulary, rebuilt from the BPE merges that ship inside open_clip (no hub
    here). Also benchmarks/image.py's tokenizer for its full-size pipeline."""
    from mmrag.compat import ensure_torchvision

    ensure_torchvision()
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = [tuple(m.split()) for m in gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_unet(cross: int = 32):
    from mmrag.compat import ensure_torchvision

    ensure_torchvision()
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross, attention_head_dim=(2, 4), norm_num_groups=32)


def save_ip_adapter(folder: Path, unet, *, image_embed: int = 16, encoder_projection: int = 16,
                    weight: str = "ip-adapter_sd15.safetensors") -> Path:
    """An IP-Adapter for ``unet`` in the h94/IP-Adapter layout: models/<weight> and models/image_encoder/."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=encoder_projection, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37, image_size=32, patch_size=8))
    encoder.save_pretrained(folder / "models" / "image_encoder")
    save_file(ip_adapter_state(unet, image_embed, scale=0.5), str(folder / "models" / weight))
    return folder


def ip_adapter_state(unet, image_embed: int, *, scale: float) -> dict:
    """Random IP-Adapter weights for ``unet`` (an SD-family image projection and, per cross-attention layer, the
    key and value projections of the image tokens) under h94/IP-Adapter's names. Shared with
    benchmarks/image.py, which builds one for the full-size UNet."""
    import torch

    cross = unet.config.cross_attention_dim
    state = {"image_proj.proj.weight": torch.randn(4 * cross, image_embed) * scale,
             "image_proj.proj.bias": torch.zeros(4 * cross),
             "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    key = 1  # the IP-Adapter numbering: 1, 3, 5, ... over the UNet's cross-attention layers, in processor order
    channels = unet.config.block_out_channels
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        state[f"ip_adapter.{key}.to_k_ip.weight"] = torch.randn(hidden, cross) * scale
        state[f"ip_adapter.{key}.to_v_ip.weight"] = torch.randn(hidden, cross) * scale
        key += 2
    return state


def build_tiny_sd(root: Path) -> dict[str, Path]:
    """Folders: ``sd`` (StableDiffusionPipeline), ``taesd`` (AutoencoderTiny), ``ip`` (matching IP-Adapter),
    ``ip_other_unet`` (an IP-Adapter for a UNet of another width), ``ip_other_encoder`` (adapter and image encoder
    disagree), ``not_a_pipeline`` (a transformers model folder)."""
    import torch

    from mmrag.compat import ensure_torchvision

    ensure_torchvision()
    from diffusers import AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer(root / "tokenizer-src")
    torch.manual_seed(0)
    unet = tiny_unet()
    # Four blocks: the same 8x down-sampling as the real SD VAE and TAESD, so either decodes the UNet's latents.
    vae = AutoencoderKL(block_out_channels=[32, 32, 32, 32], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        latent_channels=4, norm_num_groups=32, sample_size=SIZE)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), projection_dim=32))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=EulerDiscreteScheduler(timestep_spacing="trailing", steps_offset=1),
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root / "sd")
    AutoencoderTiny(encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16, 16, 16, 16),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                    latent_channels=4).save_pretrained(root / "taesd")
    save_ip_adapter(root / "ip", unet)
    save_ip_adapter(root / "ip_other_unet", tiny_unet(cross=24))
    save_ip_adapter(root / "ip_other_encoder", unet, image_embed=16, encoder_projection=8)
    text_encoder.save_pretrained(root / "not_a_pipeline")
    return {"sd": root / "sd", "taesd": root / "taesd", "ip": root / "ip", "ip_other_unet": root / "ip_other_unet",
            "ip_other_encoder": root / "ip_other_encoder", "not_a_pipeline": root / "not_a_pipeline"}


def image_settings(tiny_sd: dict[str, Path], *, ip: str | None = "ip", tiny_autoencoder: bool = False,
                   precision: str = "fp32", **image: object) -> dict[str, object]:
    """Settings overrides for the tiny models (fp32: bf16 pays off on full-size models, not on 32-channel ones)."""
    options: dict[str, object] = {}
    if ip:
        options["ip_adapter"] = str(tiny_sd[ip])
    if tiny_autoencoder:
        options["tiny_autoencoder"] = str(tiny_sd["taesd"])
    # CLIP is random in tests: references pass on their context text's real MiniLM cosine only.
    section = {"width": SIZE, "height": SIZE, "steps": 2, "reference_clip_threshold": 1.0} | image
    return {"models": {"image_generator": {"path": str(tiny_sd["sd"]), "options": options, "precision": precision}},
            "image": section}
