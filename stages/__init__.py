"""The data flow, one module per step: search -> load -> coregister -> masks -> tile -> remove -> mosaic/write."""
