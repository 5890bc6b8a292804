"""Drop-in nn.Modules built on mome.ops: attention, multiway layers, MoME layers, heads."""
