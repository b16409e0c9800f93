import FPGACtlCommands

#if canImport(Glibc)
  import Glibc
#endif

exit(await FPGACtl.execute(Array(CommandLine.arguments.dropFirst())))
