"""Training: plain and adversarial training, fine-tuning of compressed models (PGD-AT, TRADES,
compression-aware training, HYDRA). Uses attacks, compression and layers.
"""
