"""The interop area: reading official `.pth` files, converting them, exporting and predicting."""
