"""diffstack: a diffusion image service whose speed comes from plugins that the host measures."""

__version__ = "0.1.0"
