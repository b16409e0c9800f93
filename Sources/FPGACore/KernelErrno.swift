/// The errno values that sysfs writes of SR-IOV and VFIO attributes return, with Linux's
/// numbers, so the simulator and the Linux platform speak the same language.
public enum KernelErrno: Int32, Error, Hashable, Sendable, CustomStringConvertible {
  case EPERM = 1
  case ENOENT = 2
  case EIO = 5
  case ENODEV = 19
  case EINVAL = 22
  case EBUSY = 16
  case ERANGE = 34
  case EEXIST = 17
  case ENOSPC = 28
  case ETIMEDOUT = 110

  public var description: String { "\(name) (errno \(rawValue))" }

  public var name: String {
    switch self {
    case .EPERM: "EPERM"
    case .ENOENT: "ENOENT"
    case .EIO: "EIO"
    case .ENODEV: "ENODEV"
    case .EINVAL: "EINVAL"
    case .EBUSY: "EBUSY"
    case .ERANGE: "ERANGE"
    case .EEXIST: "EEXIST"
    case .ENOSPC: "ENOSPC"
    case .ETIMEDOUT: "ETIMEDOUT"
    }
  }
}

/// Turns the kernel's answers to SR-IOV writes into errors a person can act on
/// (the table in shared/reference/linux-sriov-qdma-vfio.md).
public enum SRIOVErrors {
  public static func numVFsWrite(
    _ errno: KernelErrno, pf: PCIAddress, requested: Int, current: Int, total: Int
  ) -> AgentError {
    let cause = "sriov_numvfs write of \(requested) returned \(errno)"
    switch errno {
    case .EBUSY:
      return AgentError(
        .failedPrecondition,
        "PF \(pf) already has \(current) VFs enabled; the kernel only changes a non-zero count through 0",
        cause: cause)
    case .ERANGE:
      return AgentError(
        .invalidArgument, "PF \(pf) supports at most \(total) VFs (sriov_totalvfs); \(requested) asked",
        cause: cause)
    case .ENOENT:
      return AgentError(
        .failedPrecondition,
        "PF \(pf) has no driver bound: bind its PF driver (qdma-pf on QDMA cards) before changing its VF count",
        cause: cause)
    case .EPERM:
      return AgentError(
        .failedPrecondition,
        "PF \(pf) cannot enable VFs: its bitstream has no mailbox, so SR-IOV is unavailable", cause: cause)
    case .EINVAL:
      return AgentError(.invalidArgument, "\(requested) is not a valid VF count for PF \(pf)", cause: cause)
    case .ETIMEDOUT:
      return AgentError(
        .unavailable,
        "PF \(pf): the VF count write is still blocked in the kernel; a VF of it is still held by a VM",
        cause: cause)
    default:
      return AgentError(.internal, "PF \(pf): changing the VF count failed", cause: cause)
    }
  }
}
