"""Models: the registry of architectures, training recipes, and the model artifact (weights plus
the model card that owns everything scoring needs to rebuild them)."""
