"""Evaluation components: FID (torch-fidelity's Inception), CLIP score, image grids, eval cards."""
