"""Training data: concept folders, image, clip and mask loading, the latent cache, the dataset.

Import from the submodules. ``concept`` imports neither torch nor PIL, so the UI can scan a
folder for its counts without loading the training stack; this package file stays empty of
imports for the same reason.
"""
