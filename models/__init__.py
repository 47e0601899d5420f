"""Models and their normalisation layers.

`models.norms.get_norm_act` builds every normalisation by name; the model families and
`get_model` arrive in `models/` beside it.
"""
