"""What travels between the ServerApp and the ClientApp: record names, weights, reply checks.

Both server/ and client/ import this package (and neither imports the other):

* :mod:`protocol.arrays`: model weights <-> Flower ArrayRecord with one copy each way, and
  which entries travel (trainable parameters only);
* :mod:`protocol.messages`: the names of the records in a training message and its reply,
  and :func:`protocol.messages.validate_update`, the server's check of a reply.
"""
