"""Transcoders: sparse features that read an MLP's input and predict that MLP's output, one per
layer (a transcoder set), and the attribution graphs of single prompts built on them
(`workbench.transcoders.graph`)."""
