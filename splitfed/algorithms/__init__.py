"""The algorithms of the thesis, each a strategy on the interface of `base.Strategy`.

`aggregate` holds the arithmetic as pure functions; `cnn` what the split-CNN algorithms share;
`pyvertical/` and `fedsl/` are packages of their own (model, strategy, simulation). The
simulator's registry (`splitfed.simulate.REGISTRY`) is the one place that lists them.
"""
