"""Reference pipelines that reproduce training previews. Nothing here imports ``parity``."""
