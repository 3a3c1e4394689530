"""fastssl.ops."""
