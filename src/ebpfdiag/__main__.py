from ebpfdiag.cli import main

main()
