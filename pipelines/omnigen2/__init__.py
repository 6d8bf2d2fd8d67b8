"""Our own OmniGen2: transformer, scheduler, noise and pipeline, reproducing ai-toolkit's previews."""
