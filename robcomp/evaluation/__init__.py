"""Evaluation: ``evaluate(model, data, attacks)`` and what it measures (timing, environment, sanity
checks, randomised models, text models in embedding space). Produces the JSON record.
"""
