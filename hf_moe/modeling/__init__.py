"""Model code. A flat folder with single-dot imports only: its files are copied next to every saved checkpoint."""
