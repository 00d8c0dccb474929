"""Panoptic SegFormer modules: neck, encoder, decoders, criterion and post-processing."""
