"""Architecture surgery: head gates, growing and pruning heads, neurons and layers,
layerwise feedback, and the record that lets a reshaped model save and load.

Every operation takes a model and returns a new one (a deep copy); the original is untouched.
"""
