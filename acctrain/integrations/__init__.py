"""Running acctrain under other systems' launchers. Each integration is a module of its own that imports its system
only when used, so that `import acctrain` never needs it:

- `acctrain.integrations.ray`: an Engine on Ray Train's workers (`pip install "acctrain[ray]"`).
"""
