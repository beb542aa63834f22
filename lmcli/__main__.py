from lmcli.cli import main

main()
