#if canImport(Glibc)
  @preconcurrency import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif

/// Where fpgactl writes. The process's stdout/stderr by default; tests capture it.
public struct Console: Sendable {
  public var out: @Sendable (String) -> Void
  public var err: @Sendable (String) -> Void

  public init(out: @escaping @Sendable (String) -> Void, err: @escaping @Sendable (String) -> Void) {
    self.out = out
    self.err = err
  }

  public static let standard = Console(
    out: { line in
      fputs(line + "\n", stdout)
      fflush(stdout)
    },
    err: { line in fputs(line + "\n", stderr) })

  @TaskLocal public static var current = Console.standard
}

func say(_ line: String) { Console.current.out(line) }
func complain(_ line: String) { Console.current.err(line) }

/// Columns padded to their widest cell; the last column is not padded.
func table(_ header: [String], _ rows: [[String]]) -> [String] {
  let all = [header] + rows
  var widths = [Int](repeating: 0, count: header.count)
  for row in all {
    for (index, cell) in row.enumerated() where index < widths.count {
      widths[index] = max(widths[index], cell.count)
    }
  }
  return all.map { row in
    row.enumerated().map { index, cell in
      index == row.count - 1 ? cell : cell + String(repeating: " ", count: widths[index] - cell.count)
    }.joined(separator: "  ")
  }
}
