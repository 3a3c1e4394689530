"""fastssl.train: recipes, trainer and the ``fastssl train`` command."""
