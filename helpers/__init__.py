"""Small, tested building blocks behind the monster-diffusion notebooks (one idea per module)."""
