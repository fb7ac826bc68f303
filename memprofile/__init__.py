"""memprofile: where every byte of a training step goes, measured and predicted.

Knows nothing about how adapters are attached: it measures any `nn.Module` training step and
predicts memory from a `config.json`. The sweep over training configurations lives in
`qlora.profile`.
"""
