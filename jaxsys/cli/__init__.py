"""The command line: `jaxsys train | sample | config | plan | launch` (`main`), and `launch`,
the local multi-process launcher. The top layer: it may import any other.
"""
