"""What every model family's replay shares: LoRA files and their patching, the CPU noise draws, CPU profiles."""
