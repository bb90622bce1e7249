"""Wire messages, their canonical signed bytes, decoding of untrusted bytes, and checks."""
