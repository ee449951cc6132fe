"""Embedded data sets and small models (digits, SmallCNN, MLP, TinyViT): nothing is downloaded.
"""
