"""A pretrained diffusers AutoencoderKL as the 1-channel VAE of stage 1 (``pretrained_vae``)."""

from __future__ import annotations

from pathlib import Path


def gray_from_rgb(vae):
    """Fold a 3-channel AutoencoderKL into an exact 1-channel one.

    A gray image replicated to RGB through conv_in equals conv_in with its weights summed over
    the input channels; the mean of the RGB output equals conv_out with weights and bias
    averaged over the output channels.
    """
    from diffusers import AutoencoderKL

    cfg = dict(vae.config)
    if cfg["in_channels"] == 1 and cfg["out_channels"] == 1:
        return vae
    cfg.update(in_channels=1, out_channels=1)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    gray = AutoencoderKL.from_config(cfg)
    state = vae.state_dict()
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"].sum(1, keepdim=True)
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"].mean(0, keepdim=True)
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"].mean(0, keepdim=True)
    gray.load_state_dict(state)
    return gray


def load_pretrained_vae(path: str):
    from diffusers import AutoencoderKL

    folder = Path(path)
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"pretrained_vae {path!r}: no AutoencoderKL config.json there")
    return gray_from_rgb(AutoencoderKL.from_pretrained(folder))
