"""parity: replay ai-toolkit training previews and tell whether inference matches them."""

__version__ = "0.1.0"
