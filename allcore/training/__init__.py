"""A training run without Ray: a recipe's model, datasets and loaders, the loop, the distributed
pieces each worker uses, and fitting the trust checks on the exported model."""
