# Exit census from a tracefs text trace of KVM's kvm_exit, kvm_pio, kvm_mmio,
# kvm_msr, kvm_userspace_exit and kvm_entry events (POSIX awk, busybox awk too;
# run by bench/boot-lab.sh on one VMM's boot). For every exit (kvm_exit up to
# the same thread's next kvm_entry) it finds what the exit was about and adds
# it to two tables, printed as tab-separated lines:
#
#   R <count> <microseconds> <reason>          by exit reason (npf, io, msr, hlt, ...)
#   D <count> <microseconds> <reason detail>   by reason and what: the port, the
#                                              MMIO page, the MSR, and [user] when
#                                              the exit went out to the VMM process
#   T <exits> <microseconds> <threads>         the totals
#   S 1 <microseconds> startup                 from the trace marker `exec` (written
#                                              just before the VMM's exec) to its
#                                              first kvm_entry: exec to first KVM_RUN
#
# Microseconds are the time from the exit to the next entry on that thread:
# KVM's handling, plus the VMM's for an exit to user space, plus, for hlt, the
# time the vCPU slept. Thread names may hold spaces (Firecracker's "fc_vcpu 0"),
# so fields are found by their shape, not their position.
function hexpage(h) {
  sub(/^0x/, "", h)
  if (length(h) <= 3) return "0x0"
  return "0x" substr(h, 1, length(h) - 3) "000"
}
/tracing_mark_write: exec$/ {
  for (i = 1; i <= NF; i++) if ($i == "tracing_mark_write:") { t_mark = $(i - 1); sub(/:$/, "", t_mark) }
  next
}
{
  ev = ""; ts = ""; pid = ""
  for (i = 1; i <= NF; i++) {
    if ($i ~ /^\[[0-9]+\]$/ && pid == "") { p = $(i - 1); sub(/.*-/, "", p); pid = p }
    if ($i ~ /^kvm_[a-z_0-9]+:$/) { ev = $i; ts = $(i - 1); sub(/:$/, "", ts); break }
  }
  if (ev == "" || pid == "") next
  sub(/:$/, "", ev)
  if (ev == "kvm_exit") {
    r = "?"
    for (j = i + 1; j < NF; j++) if ($j == "reason") { r = $(j + 1); break }
    t_exit[pid] = ts; reason[pid] = r; detail[pid] = ""; user[pid] = 0
  } else if (!(pid in t_exit)) {
    if (ev == "kvm_entry" && t_mark != "" && t_first == "") t_first = ts
    next
  } else if (ev == "kvm_pio" && detail[pid] == "") {
    # pio_write at 0x3f8 size 1 count 1 val 0x41
    dir = $(i + 1); sub(/^pio_/, "", dir)
    detail[pid] = $(i + 3) " " dir
  } else if (ev == "kvm_mmio" && detail[pid] == "") {
    # mmio write len 4 gpa 0xd0000050 val 0x1 (unsatisfied-read first for a read)
    dir = $(i + 2); if (dir == "unsatisfied-read") dir = "read"
    g = ""
    for (j = i + 1; j < NF; j++) if ($j == "gpa") { g = $(j + 1); break }
    detail[pid] = "mmio " hexpage(g) " " dir
  } else if (ev == "kvm_msr" && detail[pid] == "") {
    # msr_write 6e0 = 0x... / msr_read 1b = 0x...
    dir = $(i + 1); sub(/^msr_/, "", dir)
    detail[pid] = "0x" $(i + 2) " " dir
  } else if (ev == "kvm_userspace_exit") {
    user[pid] = 1
  } else if (ev == "kvm_entry") {
    if (t_mark != "" && t_first == "") t_first = ts
    us = (ts - t_exit[pid]) * 1000000
    if (us < 0) us = 0
    r = reason[pid]
    d = r
    if (detail[pid] != "") d = d " " detail[pid]
    if (user[pid]) d = d " [user]"
    rn[r]++; rt[r] += us; dn[d]++; dt[d] += us
    n++; total += us; threads[pid] = 1
    delete t_exit[pid]
  }
}
END {
  for (k in rn) printf "R\t%d\t%.0f\t%s\n", rn[k], rt[k], k
  for (k in dn) printf "D\t%d\t%.0f\t%s\n", dn[k], dt[k], k
  nt = 0; for (k in threads) nt++
  printf "T\t%d\t%.0f\t%d\n", n, total, nt
  if (t_first != "") printf "S\t1\t%.0f\tstartup\n", (t_first - t_mark) * 1000000
}
