"""A migration that takes half a second: replicas upgrading at once overlap in it."""

from pathlib import Path

HERE = Path(__file__).parent
