"""What a trained SAE found: feature visualizations, dataset examples, spliced-in fidelity, curve detectors,
the automated interpretability index, k-means directions and the HTML feature browser.

Import from the submodules (`sae.analysis.curves`, ...); this package imports nothing eagerly, so that
loading one analysis never pays for the others.
"""
