"""FLUX.1 (dev/schnell layout) replays of ai-toolkit previews, on diffusers' FluxTransformer2DModel and
AutoencoderKL and transformers' CLIP and T5 encoders."""
