"""The merge contract and its machinery: the method registry and the one entry point
`merge` (`registry`; `method`: what a method declares in its register(...) call), the docs'
method table rendered from those declarations (`method_table`), pieces several methods
share (`blocks`; `matrices`: the per-matrix loop and linear algebra of the SVD merges), streaming over tensors in blocks
(`streaming`), per-client weights, steps and normalisers (`per_client`), what a
personal method returns, one model per client (`personal`), a method's lambda
units (`scales`), validation search spaces and their expansion (`search`), LiNeS's
per-layer scaling of any method's update (`lines`), and the merges
that learn or pick from the clients' models (`learned`: aTLAS / AdaMerging coefficients,
`soups`, `ensemble`). The methods themselves are files in fl_merge/methods/.

May import: fl_merge.core.
"""
