"""mailbot: your email acts for you."""

__version__ = "0.1.0"
