"""The offline Dispatcher: runs a graph of modules on one machine (``ion-offline``)."""
