"""gradhub's shared library: the wire, codecs, coordination, configuration, errors.

The server (`gradhub_server`) and the worker (`gradhub_worker`) both depend on this
package and never on each other.
"""

__version__ = "0.1.0"
