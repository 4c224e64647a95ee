from deltawise.cli import main

main()
